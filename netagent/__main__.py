from netagent.cli.entry import main

main()
