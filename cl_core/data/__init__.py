"""Experience data shared by the gateway and the pipeline: S3, experience records (writer/reader), the durable
watermark, validation (Great Expectations) and the main job's seed batch."""
