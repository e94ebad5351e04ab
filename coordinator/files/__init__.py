"""Stored files: result images and the image uploads that become them, behind one interface.

store.py     FileStore: what the handlers call (put, stream, delete, exists, the upload
             spool and its markers)
backend.py   open_file_store: the back end `--file-store` names
spool.py     an upload's body streamed to a local temporary file while hashed (both
             back ends check an upload there before it is kept)
local.py     LocalFiles: files under the data directory (`--file-store local`, the
             default): results/<ab>/<rest>.png and uploads/<job>/<worker>/<index>
database.py  DatabaseFiles: rows of the stored_files table in chunks (`--file-store
             database`), so coordinators on several machines sharing one PostgreSQL
             database serve each other's images
"""

from coordinator.files.backend import FILE_STORES, file_store_problem, open_file_store
from coordinator.files.database import DatabaseFiles
from coordinator.files.local import LocalFiles
from coordinator.files.spool import Spooled
from coordinator.files.store import FileStore

__all__ = [
    "FILE_STORES",
    "DatabaseFiles",
    "FileStore",
    "LocalFiles",
    "Spooled",
    "file_store_problem",
    "open_file_store",
]
