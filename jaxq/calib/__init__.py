"""Calibration: tracing, site discovery, the statistics interpreter (sequential mode), and
compressed execution of any model on a params pytree holding compressed leaves."""

from jaxq.calib.apply import apply
from jaxq.calib.collectors import BUILTIN as COLLECTORS
from jaxq.calib.collectors import Collector, get_collector, register_collector
from jaxq.calib.fuse import fuse_siblings
from jaxq.calib.interpreter import calibrate, collect_stats
from jaxq.calib.trace import Site, Traced, discover_sites, find_sites, sibling_groups, trace

__all__ = [
    "COLLECTORS", "Collector", "Site", "Traced", "apply", "calibrate", "collect_stats",
    "discover_sites", "find_sites", "fuse_siblings", "get_collector", "register_collector",
    "sibling_groups", "trace",
]
