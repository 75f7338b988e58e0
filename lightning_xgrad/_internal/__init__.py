"""Helpers every layer of the package may use: tensor-list chunking with an explicit budget, reading scalars without
device syncs, argument checks, the private torch and Lightning APIs (one function each), optimizer wrappers and step
hooks, rank-local views of sharded parameters, and Adam's update direction. They import nothing else of the package.
"""
