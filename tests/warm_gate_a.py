"""A module a fork-server test preloads and holds: its import ends once the test says so."""

from tests.warm_target import hold

IMPORTED_BY = hold(__name__)  # the pid of the process that imported it
