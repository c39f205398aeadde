"""twistd dropin for Enclaves: ``twistd enclaves``.

This file must stay import-light: an exception here turns into twistd's
confusing "Unknown command", so the real work lives in ``enclaves.tap``.
"""

from twisted.application.service import ServiceMaker

enclaves = ServiceMaker(
    "Enclaves",
    "enclaves.tap",
    "End-to-end encrypted instant-messaging routing server.",
    "enclaves",
)
