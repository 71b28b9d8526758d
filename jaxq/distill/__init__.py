"""jaxq.distill"""
