"""Calibration: tracing, site discovery, the statistics interpreter (sequential mode), and
compressed execution of any model on a params pytree holding compressed leaves."""

from jaxq.calib.apply import apply
from jaxq.calib.checkpoint import LayerCheckpoint
from jaxq.calib.collectors import BUILTIN as COLLECTORS
from jaxq.calib.collectors import Collector, get_collector, register_collector
from jaxq.calib.fuse import fuse_siblings
from jaxq.calib.groups import ScaleGroup, bind_groups, scale_groups, traced_scale_groups
from jaxq.calib.interpreter import Checkpoint, calibrate, collect_stats
from jaxq.calib.trace import Site, Traced, discover_sites, find_sites, sibling_groups, trace

__all__ = [
    "COLLECTORS", "Checkpoint", "Collector", "LayerCheckpoint", "ScaleGroup", "Site", "Traced",
    "apply", "bind_groups", "calibrate", "collect_stats", "discover_sites", "find_sites",
    "fuse_siblings", "get_collector", "register_collector", "scale_groups", "sibling_groups",
    "trace", "traced_scale_groups",
]
