"""Names of every host object kh creates, each carrying kh's tag (a name prefix), so that
`kh clean` can find exactly kh's objects. Kept free of heavy imports: the CLI needs it too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FabricConfig:
    """Names of everything kh creates carry ``prefix`` so `kh clean` finds exactly them."""

    prefix: str = "kh"
    uplink_netns: str | None = None  # where the external domain's outside end goes
    own_outside: bool = False  # uplink_netns is kh's own outside world (``outside_netns``)

    @property
    def netns(self) -> str:
        return f"{self.prefix}-fabric"

    @property
    def outside_netns(self) -> str:
        """The outside world's namespace kh makes and owns (kh.hw.outside): kh's name alone,
        never an operator's (`--uplink-netns` refuses it)."""
        return f"{self.prefix}-outside"

    def bridge(self, netid: int) -> str:
        return f"{self.prefix}br{netid}"

    def vxlan(self, netid: int) -> str:
        """Domain ``netid``'s VXLAN device, when the domain spans hosts (kh.hw.stretch)."""
        return f"{self.prefix}vx{netid}"

    def underlay(self, n: int = 0) -> str:
        """The underlay interface ``n`` in kh's namespace, to kh's other hosts (kh.hw.stretch)."""
        return f"{self.prefix}ul{n}"

    def tap(self, node: int, slot: int) -> str:
        return f"{self.prefix}{node}s{slot}"

    @property
    def uplink(self) -> str:
        return f"{self.prefix}up0"  # fabric end of the external veth

    @property
    def outside(self) -> str:
        return f"{self.prefix}out0"  # outside end of the external veth
