"""Thin Nipype wrappers around spineqprep's pure functions."""
