"""An import-linter contract: code imports another module's public names only.

Why: a name with a leading underscore is a module's private business; when another module
reaches for it (the old `precision` -> `indexer._Run`), the two are welded together and a
change to one silently breaks the other. Imports inside one module's own package may still
share private helpers only through a public name, so the rule is simply: no `_name` from
another module, anywhere in `source_modules` (default: the whole root package).
"""

from __future__ import annotations

import re

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

IMPORTED_NAMES = re.compile(r"^\s*from\s+\S+\s+import\s+\(?(?P<names>[^)#]+)")


def private_names(line: str) -> list[str]:
    """The `_private` names that an import line takes, e.g. 'from a.b import _c, d' -> ['_c']."""
    match = IMPORTED_NAMES.match(line)
    if not match:
        return []
    names = [part.strip().split(" as ")[0].strip() for part in match.group("names").split(",")]
    return [n for n in names if n.startswith("_") and not n.startswith("__")]


class PublicNamesContract(Contract):
    type_name = "public_names"

    source_modules = fields.SetField(subfield=fields.ModuleExpressionField(), required=False)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        roots = {str(m.expression) for m in (self.source_modules or ())} or set(self.session_options["root_packages"])
        offences = []
        for importer in sorted(graph.modules):
            if not any(importer == r or importer.startswith(r + ".") for r in roots):
                continue
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                for detail in graph.get_import_details(importer=importer, imported=imported):
                    for name in private_names(detail["line_contents"]):
                        offences.append(f"{importer} (l.{detail['line_number']}) -> {imported}.{name}")
        return ContractCheck(kept=not offences, metadata={"offences": offences})

    def render_broken_contract(self, check: ContractCheck) -> None:
        output.print_error("Private names imported from another module:", bold=False)
        output.new_line()
        for offence in check.metadata["offences"]:
            output.print_error(f"- {offence}", bold=False)
