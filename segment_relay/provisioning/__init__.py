"""Sets up the Adobe side: the Kinesis or Event Hubs destination, its dataflow and the audiences
it exports, through IMS and the Flow Service and Segmentation APIs, from a declarative file."""
