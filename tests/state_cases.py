"""Data shared by the store tests (imported as a top-level module: pytest puts tests/ on sys.path)."""

# (namespace, segment_id) pairs that an encoding of the two into one key could get wrong.
AWKWARD_KEYS = [
    ("ups", "seg-1"),
    ("a/b", "c"),  # must not collide with the next one
    ("a", "b/c"),
    ("a/b/", "/c/"),
    ("%2F", "x"),  # a namespace spelling the escape itself
    ("/", "x"),
    ("%", "%2F"),
    ("a|b", "c|d"),  # the value separator inside a key changes nothing
    ("ns:x", "profile:y"),
    ("", ""),
    ("ns with spaces", "Ünïcødé ✓"),
]
