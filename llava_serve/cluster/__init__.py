"""The client side of the cluster (`ClusterClient`), shared by the OpenAI API, the web demo and the tools."""
