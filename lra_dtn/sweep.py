"""The LN-vs-DTN grid as one job (being written)."""
import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out")


def main(args: argparse.Namespace) -> None:
    raise SystemExit("sweep: not implemented yet")
