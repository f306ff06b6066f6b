from alignloop.cli import main

main()
