"""Tensor columns of the training shards: fixed-shape arrays stored as raw C-order bytes, one Parquet value per clip.

A tensor column is a `fixed_size_binary(nbytes)` column whose field metadata names the per-row
dtype and shape (`tensor_dtype`, `tensor_shape`), so every shard describes itself. We deliberately
do not write Ray's `ArrowTensorType`: its storage is a (large) list, and Parquet writes a repetition
and a definition level per list element, so a 16-clip shard of 8 x 64 x 64 frames took 30-40 ms to
encode (12.6 MB uncompressed for 3.2 MB of pixels) against ~2 ms as fixed-size binary, which made
the write the preprocessing job's most expensive step. Reading back is Ray Data's own documented
route for serialized tensors, `read_parquet(..., tensor_column_schema=...)`, with the schema taken
from the shard's metadata (`read_dataset`); `table_to_numpy` does the same for direct pyarrow reads.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

__all__ = ["TENSOR_DTYPE", "TENSOR_SHAPE", "ENCODING", "table_from_columns", "parquet_bytes", "tensor_column_schema",
           "table_to_numpy", "read_dataset"]

TENSOR_DTYPE, TENSOR_SHAPE = b"tensor_dtype", b"tensor_shape"
# Recorded in the preprocessing manifest; one output never mixes encodings (read_parquet needs one schema).
ENCODING = "raw-bytes-tensors-v1"


def _tensor_column(name: str, values: np.ndarray):
    """(B, *shape) array -> (field with dtype/shape metadata, fixed_size_binary array), zero-copy."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    row_bytes = values.itemsize * int(np.prod(values.shape[1:], dtype=np.int64))
    array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), len(values),
                                                 [None, pa.py_buffer(values.reshape(-1).view(np.uint8))])
    metadata = {TENSOR_DTYPE: values.dtype.str.encode(), TENSOR_SHAPE: json.dumps(values.shape[1:]).encode()}
    return pa.field(name, array.type, nullable=False, metadata=metadata), array


def table_from_columns(columns: dict[str, np.ndarray]):
    """Numpy columns (all of length B) -> pyarrow Table: arrays of ndim >= 2 become tensor columns."""
    import pyarrow as pa

    fields, arrays = [], []
    for name, values in columns.items():
        values = np.asarray(values)
        if values.ndim >= 2:
            field, array = _tensor_column(name, values)
        else:
            array = pa.array(values.tolist() if values.dtype == object else values)
            field = pa.field(name, array.type)
        fields.append(field)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def parquet_bytes(columns: dict[str, np.ndarray], compression: str = "lz4") -> bytes:
    """Numpy columns -> one Parquet file's bytes (tensor columns as raw bytes; see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table_from_columns(columns)
    sink = pa.BufferOutputStream()
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]  # dictionary-encode names, not pixels
    # Min/max statistics for the scalar columns only: a tensor's raw-byte min/max filters nothing, and
    # computing it copies whole values (one 81x480x832 clip: a 700 ms shard write, 120 ms without).
    scalars = [f.name for f in table.schema if not pa.types.is_fixed_size_binary(f.type)]
    pq.write_table(table, sink, compression=compression, use_dictionary=strings, write_statistics=scalars)
    return sink.getvalue().to_pybytes()


def tensor_column_schema(schema, columns: Sequence[str] | None = None) -> dict[str, tuple[np.dtype, tuple]]:
    """{column: (dtype, per-row shape)} of the tensor columns of a shard schema (optionally only `columns`)."""
    out = {}
    for field in schema:
        meta = field.metadata or {}
        if TENSOR_SHAPE in meta and (columns is None or field.name in columns):
            out[field.name] = (np.dtype(meta[TENSOR_DTYPE].decode()), tuple(json.loads(meta[TENSOR_SHAPE])))
    return out


def table_to_numpy(table) -> dict[str, Any]:
    """Shard table -> {column: (N, *shape) ndarray for tensor columns, Python list otherwise}.

    Shards written before ENCODING hold Ray's tensor extension columns instead; they are read too
    (as numpy) when Ray Data is imported, which registers those types.
    """
    import pyarrow as pa

    tensors = tensor_column_schema(table.schema)
    out: dict[str, Any] = {}
    for name, column in zip(table.column_names, table.columns):
        if isinstance(column.type, pa.ExtensionType):
            out[name] = column.combine_chunks().to_numpy(zero_copy_only=False)
            continue
        if name not in tensors:
            out[name] = column.to_pylist()
            continue
        dtype, shape = tensors[name]
        chunk = column.combine_chunks()
        row_bytes = chunk.type.byte_width
        raw = np.frombuffer(chunk.buffers()[1], np.uint8)[chunk.offset * row_bytes:(chunk.offset + len(chunk)) * row_bytes]
        out[name] = raw.view(dtype).reshape(len(chunk), *shape)
    return out


def read_dataset(paths: list[str], filesystem, columns: Sequence[str] | None = None, **read_kwargs):
    """The shards as a Ray Dataset whose tensor columns are Ray tensors (numpy (B, *shape) in batches).

    The tensor schema comes from the first shard's footer (every shard of an output has one
    geometry: the preprocessing job refuses to mix them).
    """
    import pyarrow.parquet as pq
    import ray.data

    schema = pq.read_schema(paths[0], filesystem=filesystem)
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=None if columns is None else list(columns),
                                 tensor_column_schema=tensor_column_schema(schema, columns) or None, **read_kwargs)
