"""Length-prefixed pickle frames over pipes (grader pool <-> worker).

Pickle is safe here: both ends are our own processes.
"""
import pickle
import struct

_HEADER = struct.Struct(">I")


def read_frame(stream) -> object | None:
  """One length-prefixed pickle from a raw (unbuffered) binary stream; None at EOF."""
  header = _read_exactly(stream, _HEADER.size)
  if header is None:
    return None
  body = _read_exactly(stream, _HEADER.unpack(header)[0])
  return None if body is None else pickle.loads(body)


def write_frame(stream, message) -> None:
  body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
  data = memoryview(_HEADER.pack(len(body)) + body)
  while data:  # raw pipe writes may be partial (e.g. interrupted by a signal)
    data = data[stream.write(data):]


def _read_exactly(stream, size: int) -> bytes | None:
  chunks = []
  while size:
    chunk = stream.read(size)
    if not chunk:
      return None
    chunks.append(chunk)
    size -= len(chunk)
  return b"".join(chunks)
