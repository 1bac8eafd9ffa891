"""One exception type for every user-facing error.

CLIs catch :class:`FlowlabError` and print its message as a single line, so a bad
config key, a missing data set or a corrupt checkpoint never ends in a traceback.
"""


class FlowlabError(Exception):
    """A user-facing error whose message is one self-explanatory line."""
