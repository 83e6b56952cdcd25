"""Ways the tests damage a file on disk, shared by the store, run-integrity and repair tests."""


def truncate(path):
    """Cut the file to its first half, as a kill in the middle of a non-atomic copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_middle_byte(path):
    """Invert one byte in the middle: the file still parses, its content is silently wrong."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
