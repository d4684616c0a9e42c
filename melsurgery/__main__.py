from melsurgery.cli import main

main()
