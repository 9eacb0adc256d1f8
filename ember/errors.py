"""One exception type for problems a user can fix (bad paths, bad config, bad input).

The CLI prints its message as one sentence on stderr and exits non-zero; library callers
can catch it. Anything else that escapes is a bug in Ember.
"""


class EmberError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""
