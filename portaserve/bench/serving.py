def add_cli_args(p):
    pass


def run_from_cli(ns):
    return 1
