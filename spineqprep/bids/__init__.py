"""The spine extension of BIDS: schema, pybids layout, validation and derivative naming.

Submodules (imported on use, pybids is slow to import): ``schema`` (the machine-readable
extension), ``layout`` (finding series), ``validate`` (the extension's checks), ``validator``
(the official BIDS validator), ``derivatives`` (output names and atomic writers).
"""
