"""melsurgery's test suite: a package, so that test modules import their support code by its full name
(``from tests.support.planted import ...``) with nothing put on ``sys.path`` by hand."""
