from stepcast.cli.main import main

main()
