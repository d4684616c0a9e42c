"""One module per command (thin: parse, call the library, print); `shared` holds the options and error mapping."""
