"""The network as a participant sees it: transports, discovery, routing and the client."""
