from kh.cli.main import main

main()
