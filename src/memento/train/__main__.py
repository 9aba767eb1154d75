"""`python -m memento.train ...` = `memento train ...`; the entry point for `accelerate launch -m`."""

from memento.train.cli import main

if __name__ == "__main__":
    main()
