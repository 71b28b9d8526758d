"""jaxq.export"""
