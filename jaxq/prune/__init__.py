"""jaxq.prune"""
