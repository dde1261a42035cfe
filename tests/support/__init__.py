"""Helpers of the tests that fixtures cannot express (used at collection time or by plain functions).

Not a test module: nothing here is collected.
"""
