from selfhost.cli.app import main

main()
