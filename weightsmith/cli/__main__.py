import sys

from weightsmith.cli import program

if __name__ == "__main__":
    sys.exit(program())
