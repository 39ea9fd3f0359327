//! What decides a store's rows, recorded in its manifest: a resumed extraction continues only
//! when all of it matches, `mood merge` joins only shards of one run, and `mood score` / `mood
//! eval` compare the provenance of the stores they read together.

/// Everything that changes the bytes of an extracted store's rows. Two runs with equal
/// identities write the same rows; a resume with another identity would mix two kinds of rows.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct Identity {
    pub mood_version: String,
    pub arch: String,
    pub weights_sha256: String,
    /// Preprocessing preset and its resolved settings.
    pub preprocess: String,
    /// f32 or bf16 (CUDA only; the CPU runs f32).
    pub precision: String,
    /// The kind of device, "cpu" or "cuda" (stores of an older mood say "cuda: <name>"): a
    /// resume or merge needs the same kind, since the CUDA kernels sum in another order.
    pub device: String,
    /// The processor and thread count ("<model name>, 16 threads") or the GPU's name: recorded,
    /// never compared, so that shards extracted on two kinds of node still merge.
    pub device_name: String,
    /// Images in the source and the SHA-256 of its listing (names relative to the source's
    /// root, labels and class names), so that a folder that changed is not resumed.
    pub source_rows: usize,
    pub source_sha256: String,
    /// (i, N) of `--shard i/N`.
    pub shard: (usize, usize),
    pub chunk: usize,
    /// Batch size: a GEMM's blocking, and so its rounding, depends on it.
    pub batch: usize,
    /// Which outputs the rows carry.
    pub logits: bool,
    pub local: bool,
    pub odin: Option<(f32, f32)>,
    pub dtype: String,
    /// The blocks of layers.npy (`--layers`); empty without it (and then not written, so a
    /// store without layers keeps the manifest of earlier versions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
}

/// Each identity field as the option that sets it, for messages.
const FLAGS: &[(&str, &str)] = &[
    ("mood_version", "mood version"),
    ("arch", "--arch"),
    ("weights_sha256", "--weights (SHA-256)"),
    ("preprocess", "--preset"),
    ("precision", "--precision"),
    ("device", "--device"),
    ("source_rows", "--data (number of images)"),
    ("source_sha256", "--data (file listing)"),
    ("shard", "--shard"),
    ("chunk", "--chunk"),
    ("batch", "--batch"),
    ("logits", "the model's head (logits)"),
    ("local", "--local"),
    ("odin", "--odin"),
    ("dtype", "--dtype"),
    ("layers", "--layers"),
];

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s)
            if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            format!("{}…", &s[..12])
        }
        serde_json::Value::String(s) if s.is_empty() => "(none)".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.len() == 2 && a.iter().all(|x| x.is_u64()) => {
            format!("{}/{}", a[0], a[1])
        }
        serde_json::Value::Array(a) => {
            let each: Vec<String> = a.iter().map(show).collect();
            format!("[{}]", each.join(", "))
        }
        serde_json::Value::Null => "(none)".into(),
        // Settings are f32: shown as the f32 they are, not as the f64 JSON widened them to.
        serde_json::Value::Number(n) if n.is_f64() => {
            format!("{}", n.as_f64().unwrap_or(0.0) as f32)
        }
        other => other.to_string(),
    }
}

/// "what differs (A: x, B: y)" for each field of two JSON objects that differs, naming each
/// field by `flags` (or its own name) and skipping those in `skip`.
pub fn differences(
    a: &serde_json::Value,
    b: &serde_json::Value,
    flags: &[(&str, &str)],
    names: (&str, &str),
    skip: &[&str],
) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (ma, mb) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
    keys.sort();
    keys.dedup();
    // Fields in the order of `flags` first (the most telling first), then the rest.
    keys.sort_by_key(|k| {
        flags
            .iter()
            .position(|f| f.0 == k.as_str())
            .unwrap_or(usize::MAX)
    });
    let null = serde_json::Value::Null;
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()))
        .filter_map(|k| {
            let (x, y) = (ma.get(k).unwrap_or(&null), mb.get(k).unwrap_or(&null));
            (x != y).then(|| {
                let flag = flags.iter().find(|f| f.0 == k).map_or(k.as_str(), |f| f.1);
                format!(
                    "{flag} ({}: {}, {}: {})",
                    names.0,
                    show(x),
                    names.1,
                    show(y)
                )
            })
        })
        .collect()
}

impl Identity {
    /// The fields that differ between the store's identity (`self`) and this run's, as
    /// "--chunk (the store: 32, this run: 16)", skipping the fields named in `skip`.
    pub fn differences(&self, run: &Identity, names: (&str, &str), skip: &[&str]) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self.compared()).unwrap_or_default(),
            serde_json::to_value(run.compared()).unwrap_or_default(),
        );
        differences(&a, &b, FLAGS, names, skip)
    }

    /// What a comparison looks at: the device's kind, not its name.
    fn compared(&self) -> Identity {
        let kind = self.device.split(':').next().unwrap_or_default().trim();
        Identity {
            device: kind.to_string(),
            device_name: String::new(),
            ..self.clone()
        }
    }
}

/// What `mood score` and `mood eval` compare between the stores (and detector) they read
/// together: scores of features from two models, or two preprocessings, are not comparable.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct Provenance {
    pub model: String,
    pub weights_sha256: String,
    pub preprocess: String,
    pub dim: usize,
}

impl Provenance {
    /// Whether there is anything to compare (a store saved by hand records nothing).
    pub fn is_known(&self) -> bool {
        !self.model.is_empty() || !self.weights_sha256.is_empty()
    }

    /// What differs between `self` (named `a`) and `other` (named `b`), fields that either side
    /// does not record left out.
    pub fn mismatch(&self, other: &Provenance, a: &str, b: &str) -> Option<String> {
        let mut out = Vec::new();
        let mut cmp = |what: &str, x: &str, y: &str| {
            if !x.is_empty() && !y.is_empty() && x != y {
                let s = |v: &str| {
                    if v.len() == 64 {
                        format!("{}…", &v[..12])
                    } else {
                        v.to_string()
                    }
                };
                out.push(format!("{what} ({a}: {}, {b}: {})", s(x), s(y)));
            }
        };
        cmp("model", &self.model, &other.model);
        cmp(
            "weights SHA-256",
            &self.weights_sha256,
            &other.weights_sha256,
        );
        cmp("preprocessing", &self.preprocess, &other.preprocess);
        if self.dim > 0 && other.dim > 0 && self.dim != other.dim {
            out.push(format!(
                "feature width ({a}: {}, {b}: {})",
                self.dim, other.dim
            ));
        }
        (!out.is_empty()).then(|| out.join(", "))
    }
}
