"""jaxq.calib"""
