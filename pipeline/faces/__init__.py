"""Face sets: LFW layouts and protocols, folder-per-identity trees, insightface `.bin` sets (restricted unpickler), images and their transforms; one `FaceSet` type."""
