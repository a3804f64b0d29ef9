"""MetaIndex is pure logic over sqlite: tested directly, by tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from fbmount.metaindex import MetaIndex

KEYS = ["d/a", "d/b", "d/sub/c", "d0", "d/\u00e9t\u00e9", "e/a", "d"]


@pytest.fixture
def index(tmp_path: Path) -> MetaIndex:
    idx = MetaIndex(tmp_path / "meta.sqlite")
    for i, key in enumerate(KEYS):
        idx.put(key, f"etag{i}", {"mode": str(i)})
    return idx


@pytest.mark.parametrize(
    ("prefix", "limit", "keys"),
    [
        ("d/", 10, {"d/a", "d/b", "d/sub/c", "d/\u00e9t\u00e9"}),  # deeper keys too
        ("d/", 4, {"d/a", "d/b", "d/sub/c", "d/\u00e9t\u00e9"}),  # exactly the limit
        ("d/", 3, None),  # more than the limit: the caller asks per name
        ("e/", 10, {"e/a"}),
        ("x/", 10, set()),
        ("", 10, set(KEYS)),  # the bucket root
    ],
)
def test_under_returns_a_prefix_in_one_query(
    index: MetaIndex, prefix: str, limit: int, keys: set[str] | None
) -> None:
    rows = index.under(prefix, limit)
    if keys is None:
        assert rows is None
        return
    assert rows is not None and set(rows) == keys
    for key, (etag, _headers) in rows.items():
        assert index.get(key, etag) is not None  # the same answer get() gives
