"""One conflict policy for everything plugins contribute by name.

DSTs, model loaders and intervention providers are all "a name, offered by one or more
plugins".  A name offered once resolves to that offer; offered twice, it is a conflict that
names both distributions until an explicit preference (``prefer=``, ``registry.prefer``,
``SCALARLENS_PREFER``) settles it; a preference naming a plugin that offers nothing under
that name is an error too, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .exceptions import ConfigError, DstConflictError

if TYPE_CHECKING:
    from ._config import DstConfig
    from ._deriver import ScalarDeriver
    from ._dst import DerivedScalarType


class Offer(NamedTuple):
    """One plugin's offer of one named thing (a DST provision, a loader, a provider).

    A named tuple, not an attrs class: the registry is built at ``import scalarlens`` and every
    class created then counts against the startup budget.
    """

    name: str
    value: Any
    plugin: str


class OfferTable:
    """Offers of one kind (``"DST"``, ``"model loader"``, ``"intervention provider"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._offers: dict[str, list[Offer]] = {}

    def add(self, name: str, value: Any, plugin: str, *, replace: bool = False) -> None:
        offer = Offer(name, value, plugin)
        if replace:
            self._offers[name] = [offer]
        else:
            self._offers.setdefault(name, []).append(offer)

    def drop(self, plugin: str) -> None:
        for name in list(self._offers):
            kept = [o for o in self._offers[name] if o.plugin != plugin]
            if kept:
                self._offers[name] = kept
            else:
                del self._offers[name]

    def offers(self, name: str) -> tuple[Offer, ...]:
        return tuple(self._offers.get(name, ()))

    def __contains__(self, name: object) -> bool:
        return name in self._offers

    def __iter__(self) -> Iterator[str]:
        # A snapshot: another thread may register while a caller iterates (check(), listings).
        return iter(list(self._offers))

    def items(self) -> Iterator[tuple[str, list[Offer]]]:
        return iter([(name, list(offers)) for name, offers in list(self._offers.items())])

    def resolve(
        self,
        name: str,
        offers: tuple[Offer, ...],
        prefer: Mapping[str, str],
        where: Callable[[str], str],
    ) -> Offer:
        """The offer that wins for ``name``; ``where(plugin)`` describes a plugin in errors."""
        preferred = prefer.get(name)
        if preferred is not None:
            for offer in offers:
                if offer.plugin == preferred:
                    return offer
            who = "; ".join(where(o.plugin) for o in offers)
            raise ConfigError(
                f"the preference {name}={preferred} matches nothing: plugin {preferred!r} does "
                f"not offer the {self.kind} {name!r} (offered by: {who}). Fix or remove the "
                "preference (prefer=, registry.prefer or SCALARLENS_PREFER)"
            )
        if len(offers) == 1:
            return offers[0]
        who = "; ".join(where(o.plugin) for o in offers)
        raise DstConflictError(
            f"{self.kind} {name!r} is provided by more than one plugin: {who}. Choose one with "
            f"Registry(prefer={{{name!r}: '<plugin>'}}), registry.prefer({name!r}, '<plugin>') "
            f"or SCALARLENS_PREFER={name}=<plugin>, or uninstall one of them"
        )


class Provision(NamedTuple):
    """One plugin's offer of one DST: the DST and its factory."""

    dst: DerivedScalarType
    factory: Callable[[DstConfig], ScalarDeriver]
    plugin: str


class Contributions:
    """Everything loaded plugins offer, one table per hook, with one way to file and drop."""

    def __init__(self) -> None:
        self.dsts = OfferTable("DST")
        self.loaders = OfferTable("model loader")
        self.examples = OfferTable("DST example")
        self.interventions = OfferTable("intervention provider")
        self.commands = OfferTable("CLI command")
        self.features = OfferTable("feature loader")

    def named(self) -> tuple[OfferTable, ...]:
        """The tables whose names can conflict (and be settled by a preference)."""
        return (self.dsts, self.loaders, self.interventions)

    def file(self, hook: str, result: Mapping[Any, Any], plugin: str) -> list[str]:
        """File one hook's (checked) result; return the DST names it offered."""
        if hook == "scalarlens_derivers":
            for dst, factory in result.items():
                self.dsts.add(dst.name, Provision(dst, factory, plugin), plugin)
            return [dst.name for dst in result]
        table = {
            "scalarlens_model_loaders": self.loaders,
            "scalarlens_dst_examples": self.examples,
            "scalarlens_interventions": self.interventions,
            "scalarlens_cli_commands": self.commands,
            "scalarlens_feature_loaders": self.features,
        }[hook]
        for name, value in result.items():
            table.add(name, value, plugin)
        return []

    def drop(self, plugin: str) -> None:
        tables = (self.dsts, self.loaders, self.examples, self.interventions, self.commands)
        for table in (*tables, self.features):
            table.drop(plugin)
