"""A spec-conformance suite: a second implementation of the public specs.

``protocol.py`` (docs/protocol.rst) and ``storage.py`` (docs/storage.rst) were
written clean-room, from the docs, DESIGN.md and tests/vectors/handshake.json
only, never from ``enclaves/``.  The rule that keeps them worth having: they
import nothing from ``enclaves`` (only the standard library, ``cryptography``
and each other), and they are changed only from the docs, never to match the
code.  ``test_independence.py`` enforces the imports.  The ``test_*`` modules
compare them with the real implementation and so do import ``enclaves``; when
the two disagree, the docs decide which one is wrong.
"""
