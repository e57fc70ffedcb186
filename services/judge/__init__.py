"""The judge service: LLM-as-judge verdicts on criteria (gRPC ``Judge``, ``POST /criteria/judge``)."""
