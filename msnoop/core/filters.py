"""Row filters in one dialect: SQL boolean expressions, as LanceDB's ``where`` and DuckDB speak them.

Every option of msnoop that selects rows (``--where``, ``--match``, ``--control``, ``--exclude``, a screen's
``positive``/``negative``/``series``, a profile job's ``control``) takes the same kind of text::

    Metadata_Compound = 'DMSO'
    Metadata_Plate IN ('P1', 'P2') AND Metadata_Dose > 0.5
    Metadata_Gene IS NULL

Strings are in single quotes (double quotes name a column, as in SQL). On a LanceDB table the filter is
passed to LanceDB; on an in-memory table (pandas) it is evaluated by DuckDB (:func:`filter_mask`), so the
two agree on syntax, NULL handling (a NULL comparison selects nothing) and operators.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd


class FilterError(ValueError):
    """A filter is not valid SQL for the table; the message names the filter and what went wrong."""


def _hint(where: str, message: str) -> str:
    hint = ""
    if '"' in where and re.search(r"Referenced column|No field named", message):
        hint = "; strings take single quotes in SQL, e.g. Metadata_Compound = 'DMSO'"
    elif re.search(r"[&|]", where):
        hint = "; combine conditions with AND / OR, not & / |"
    first = message.strip().splitlines()[0] if message.strip() else message
    return f"filter {where!r} is not a valid SQL condition on this table: {first}{hint}"


#: A source location that LanceDB's Rust core appends to its messages (``, /root/.cargo/.../logical_expr.rs:23:88``).
_RUST_SOURCE = re.compile(r",?\s*/\S+\.rs:\d+:\d+")


def _text_columns(where: str, schema: Any) -> list[str]:
    """The string-typed columns of ``schema`` (a ``pyarrow.Schema``) that ``where`` names, longest name first."""
    import pyarrow as pa

    def is_text(t: Any) -> bool:
        t = t.value_type if pa.types.is_dictionary(t) else t
        return bool(pa.types.is_string(t) or pa.types.is_large_string(t))

    names = sorted((f.name for f in schema if is_text(f.type)), key=len, reverse=True)
    return [n for n in names if re.search(rf"\b{re.escape(n)}\b", where)]


def table_filter_error(where: str, schema: Any, exc: BaseException, *, what: str = "filter") -> FilterError:
    """One line for a filter a LanceDB table refused: what is wrong and how to write it.

    A number compared with a text column (CSV metadata stays text unless ``input.dtypes`` says otherwise) is the
    usual case: the message names the column and shows the quoted value. Otherwise the first line of LanceDB's
    message, without its Rust source location, and the hints of :func:`filter_mask`'s errors.

    Args:
        where: The filter.
        schema: The table's ``pyarrow.Schema``.
        exc: What LanceDB raised.
        what: The option's name for the message (``--where``, ``--match``).
    """
    message = _RUST_SOURCE.sub("", str(exc)).strip()
    for col in _text_columns(where, schema):
        literal = re.search(rf"\b{re.escape(col)}\s*(=|!=|<>|<=|>=|<|>)\s*(-?[0-9][0-9.eE+-]*)\b", where)
        if literal and ("Utf8" in message or "convert" in message.lower()):
            op, value = literal.groups()
            return FilterError(
                f"{what} {where!r}: {col} is a text column, so compare it with text: {col} {op} '{value}' (to "
                f"store it as a number, embed with input.dtypes: {{{col}: int}} or float)"
            )
    return FilterError(_hint(where, message).replace("filter", what, 1))


def filter_mask(df: pd.DataFrame, where: str) -> np.ndarray:
    """Evaluate the SQL condition ``where`` on every row of ``df``.

    Args:
        df: A table (any columns; ``Metadata_*`` names need no quoting).
        where: A SQL boolean expression (see the module docstring). ``==`` is accepted as ``=``.

    Returns:
        ``[len(df)]`` bool array, in ``df``'s row order; rows where the condition is NULL are False.

    Raises:
        FilterError: The condition does not parse or names a column the table does not have.
    """
    import duckdb

    if not where or not where.strip():
        raise FilterError("empty filter: expected a SQL condition such as Metadata_Compound = 'DMSO'")
    con = duckdb.connect()
    try:
        # DuckDB keeps a scan's rows in insertion order (preserve_insertion_order, on by default and set here), so
        # the result lines up with df's rows without copying df to add a row-number column (a copy of a wide,
        # fragmented table also warns)
        con.execute("SET preserve_insertion_order = true")
        con.register("t", df.reset_index(drop=True))
        out = con.execute(f"SELECT COALESCE(CAST(({where}) AS BOOLEAN), FALSE) AS m FROM t").fetchnumpy()
    except duckdb.Error as exc:
        raise FilterError(_hint(where, str(exc))) from None
    finally:
        con.close()
    return np.asarray(out["m"], dtype=bool)


def select_rows(df: pd.DataFrame, where: str, *, what: str = "filter", allow_empty: bool = False) -> pd.DataFrame:
    """The rows of ``df`` that ``where`` selects (index kept).

    Raises:
        FilterError: Invalid condition, or (unless ``allow_empty``) no row matches; ``what`` names the option.
    """
    mask = filter_mask(df, where)
    if not mask.any() and not allow_empty:
        raise FilterError(f"{what} {where!r} matches none of the {len(df)} rows")
    return df[mask]


__all__ = ["FilterError", "filter_mask", "select_rows"]
