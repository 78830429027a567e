"""The HTTP API's routers, one per resource, and what they share: the hand-described
request bodies (``schemas``) and the error handlers (``handlers``). ``rayfarm.cluster.api``
puts them together."""
