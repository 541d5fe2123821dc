"""The evaluation's user error (a set or class list that cannot be used)."""

from ..errors import UserError


class EvalDataError(UserError):
    """An evaluation set or class list that cannot be used."""
