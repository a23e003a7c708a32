"""Annotation documents as they are sent to Girder: each one's header (everything but the elements), its element
count, and its elements' JSON array, either bytes in memory or a byte range of the annotation file as it was written.

A large annotation file is checked and its elements counted in one pass, one element in memory at a time
(:func:`streamed_document`); when the document is sent, its header is re-encoded with the post's attributes and the
elements are read from the file (:class:`OutgoingDocument`): a slide's million nuclei are never held in memory.
"""

import codecs
import io
import json
import os

from .errors import CellRCNNError


class OutgoingDocument:
    """A document to send: its header (everything but the elements), its element count, and its elements' JSON array:
    bytes in memory, or the byte range ``span`` of a file (streamed, never read whole)."""

    def __init__(self, header, count, elements=b'[]', path=None, span=None):
        self.header, self.count, self.elements, self.path, self.span = header, count, elements, path, span

    @property
    def name(self):
        return self.header.get('name')

    def encode(self, attributes):
        """``(size, open)``: the JSON size of the document with these attributes, and a callable giving a fresh
        reader of it (one per try)."""
        try:
            head = json.dumps({**self.header, 'attributes': attributes}, separators=(',', ':'),
                              allow_nan=False).encode()[:-1] + b',"elements":'
        except (TypeError, ValueError) as exc:
            raise CellRCNNError(f'annotation {self.name!r} is not plain JSON ({exc})') from None
        if self.path is None:
            body = head + self.elements + b'}'
            return len(body), lambda: io.BytesIO(body)
        start, end = self.span
        return len(head) + end - start + 1, lambda: _FileSlice(head, self.path, start, end)


class _FileSlice(io.RawIOBase):
    """Reads ``head``, then bytes ``start:end`` of a file, then the closing brace."""

    def __init__(self, head, path, start, end):
        self.parts = [io.BytesIO(head), None, io.BytesIO(b'}')]
        self.path, self.start, self.left = path, start, end - start

    def readable(self):
        return True

    def close(self):
        if hasattr(self, 'file'):
            self.file.close()
        super().close()

    def read(self, n=-1):
        out = b''
        while self.parts and (n < 0 or len(out) < n):
            want = -1 if n < 0 else n - len(out)
            if self.parts[0] is None:  # the file's range
                if not hasattr(self, 'file'):
                    self.file = open(self.path, 'rb')
                    self.file.seek(self.start)
                chunk = self.file.read(self.left if want < 0 else min(want, self.left))
                self.left -= len(chunk)
                if not chunk or not self.left:
                    self.file.close()
                    self.parts.pop(0)
            else:
                chunk = self.parts[0].read(want)
                if not chunk:
                    self.parts.pop(0)
            out += chunk
        return out


def as_documents(documents):
    if isinstance(documents, dict):
        documents = [documents]
    out = []
    for doc in documents:
        if isinstance(doc, OutgoingDocument):
            out.append(doc)
            continue
        if isinstance(doc, (list, tuple)):
            out.extend(as_documents(doc))
            continue
        if isinstance(doc, dict) and isinstance(doc.get('annotation'), dict):
            doc = doc['annotation']
        if not isinstance(doc, dict) or not isinstance(doc.get('elements'), list):
            raise CellRCNNError('each annotation document must be a JSON object with an "elements" list')
        try:
            elements = json.dumps(doc['elements'], separators=(',', ':'), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise CellRCNNError(f'annotation {doc.get("name")!r} is not plain JSON ({exc})') from None
        out.append(OutgoingDocument({k: v for k, v in doc.items() if k != 'elements'}, len(doc['elements']), elements))
    return out


#: how much of a large annotation file is read at a time
_CHUNK_BYTES = 1 << 20


class _JSONReader:
    """Reads JSON values one after another from a file, a chunk at a time, keeping byte offsets."""

    def __init__(self, f):
        self.f, self.text, self.pos, self.base, self.eof = f, '', 0, f.tell(), False
        self.utf8 = codecs.getincrementaldecoder('utf-8')()
        self.decoder = json.JSONDecoder()

    def _more(self):
        if self.eof:
            return False
        chunk = self.f.read(_CHUNK_BYTES)
        self.eof = not chunk
        self.base += len(self.text[:self.pos].encode('utf-8'))
        self.text = self.text[self.pos:] + self.utf8.decode(chunk, final=self.eof)
        self.pos = 0
        return True

    def peek(self):
        """The next character that is not white space ('' at the end of the file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in ' \t\r\n':
                self.pos += 1
            if self.pos < len(self.text) or not self._more():
                return self.text[self.pos:self.pos + 1]

    def take(self, char):
        if self.peek() != char:
            raise ValueError(f'expected {char!r}')
        self.pos += 1

    def value(self):
        """The next JSON value (a value cut by the chunk's end is read again with more of the file)."""
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except ValueError:
                if self._more():
                    continue
                raise
            if end < len(self.text) or self.eof or not isinstance(value, (int, float)):
                self.pos = end
                return value
            self._more()  # a number at the chunk's end may go on

    def offset(self):
        """The byte offset of the current position in the file."""
        return self.base + len(self.text[:self.pos].encode('utf-8'))


def streamed_document(path):
    """An :class:`OutgoingDocument` for an annotation file that is one JSON object whose ``"elements"`` array is its
    last key (as ``cellrcnn.annotation`` writes it), or None when the file is laid out otherwise (it is then read
    whole). The file is checked and its elements counted on one pass, one element in memory at a time; they are
    streamed from the file when posted."""
    with open(path, 'rb') as f:
        reader = _JSONReader(f)
        header = {}
        try:
            reader.take('{')
            while True:
                key = reader.value()
                if not isinstance(key, str):
                    return None
                reader.take(':')
                if key == 'elements':
                    break
                header[key] = reader.value()
                reader.take(',')
            start = reader.offset()
            reader.take('[')
            count = 0
            while reader.peek() != ']':
                if count:
                    reader.take(',')
                if not isinstance(reader.value(), dict):
                    return None
                count += 1
            reader.take(']')
            end = reader.offset()
            reader.take('}')
            if reader.peek() != '':
                return None
        except (ValueError, UnicodeDecodeError):  # not JSON, or not laid out so: read_annotation_file explains
            return None
    return OutgoingDocument(header, count, path=path, span=(start, end))


def documents_from_files(paths, large_bytes):
    """The documents of annotation JSON files (each a document or a list of them): files over ``large_bytes`` laid
    out as :func:`streamed_document` reads are streamed, others are read whole."""
    from .annotation import read_annotation_file

    documents = []
    for path in paths:
        try:
            streamed = os.path.getsize(path) > large_bytes and streamed_document(path)
        except OSError:
            streamed = None  # read_annotation_file explains
        if streamed:
            documents.append(streamed)
            continue
        doc = read_annotation_file(path)
        documents.extend(doc if isinstance(doc, list) else [doc])
    return documents
