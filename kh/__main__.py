from kh.cli.main import run

run()
