"""Reading model sources and writing output folders."""
