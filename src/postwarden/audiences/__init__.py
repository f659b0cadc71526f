"""Audiences: who a rule such as ``attributes.plan == "pro" and in_list("beta")``
selects among a tenant's contacts (issue 20; docs/audiences.md). The language's
syntax (``syntax``: tokenizer, parser, AST, positions in errors, limits) and its
binding to a tenant's lists, topics and attribute types (``plan``). Policy: no I/O;
``store.audiences`` turns a plan into SQL."""

from postwarden.audiences.plan import Plan, Schema, compile_rule
from postwarden.audiences.syntax import RuleError, parse

__all__ = ["Plan", "RuleError", "Schema", "compile_rule", "parse"]
