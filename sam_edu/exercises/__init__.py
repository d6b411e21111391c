"""Checks for the exercise notebooks in ``exercises/``: one module per chapter.

Each ``check_*`` function calls the reader's implementation on cases with known answers from
:mod:`sam_edu.reference`, raises ``AssertionError`` with a hint when it is wrong, and prints a
one-line confirmation when it is right.
"""
