"""jaxq.lowrank"""
