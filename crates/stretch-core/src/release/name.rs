//! Memorable release names (`brave-otter`): a pure function of the release id, so the
//! same id always gets the same name, with `-2`, `-3`, … only when a name is taken.

/// Short, pleasant adjectives; 128 of them so 7 bits pick one.
const ADJECTIVES: [&str; 128] = [
    "able", "agile", "amber", "ample", "apt", "azure", "bold", "brave", "breezy", "bright",
    "brisk", "calm", "candid", "cheerful", "cheery", "clean", "clear", "clever", "cosmic", "cozy",
    "crimson", "crisp", "curious", "dapper", "daring", "dashing", "dazzling", "deft", "eager",
    "early", "easy", "elegant", "epic", "fair", "fancy", "fast", "fearless", "fine", "firm",
    "fleet", "fluent", "frank", "free", "fresh", "friendly", "gallant", "gentle", "giant", "glad",
    "golden", "good", "graceful", "grand", "happy", "hardy", "hearty", "honest", "humble", "jazzy",
    "jolly", "jovial", "joyful", "keen", "kind", "lively", "loyal", "lucid", "lucky", "magic",
    "mellow", "merry", "mighty", "modest", "neat", "nimble", "noble", "novel", "patient", "peppy",
    "placid", "plucky", "polite", "proud", "quick", "quiet", "rapid", "ready", "regal", "robust",
    "rosy", "royal", "rustic", "sage", "savvy", "serene", "sharp", "shiny", "silent", "silver",
    "simple", "sleek", "smart", "smooth", "snappy", "snug", "solid", "sonic", "spry", "steady",
    "stellar", "sturdy", "sunny", "super", "sure", "swift", "tender", "tidy", "tough", "trusty",
    "upbeat", "valiant", "vivid", "warm", "wise", "witty", "young", "zany", "zesty",
];

/// Animals; 128 of them so 7 bits pick one.
const ANIMALS: [&str; 128] = [
    "alpaca", "ant", "ape", "badger", "bear", "beaver", "bee", "bison", "bobcat", "buffalo",
    "camel", "canary", "caribou", "cat", "cheetah", "chipmunk", "condor", "cougar", "cow",
    "coyote", "crab", "crane", "crow", "deer", "dingo", "dolphin", "donkey", "dove", "duck",
    "eagle", "egret", "elk", "emu", "falcon", "ferret", "finch", "fox", "frog", "gazelle", "gecko",
    "gerbil", "gibbon", "giraffe", "gnu", "goat", "goose", "gopher", "gorilla", "grouse",
    "hamster", "hare", "hawk", "hedgehog", "heron", "hippo", "horse", "ibis", "iguana", "impala",
    "jackal", "jaguar", "jay", "kangaroo", "kestrel", "kiwi", "koala", "lark", "lemur", "leopard",
    "lion", "llama", "lobster", "lynx", "macaw", "magpie", "mallard", "manatee", "marmot",
    "marten", "meerkat", "mink", "moose", "mouse", "narwhal", "newt", "ocelot", "octopus", "orca",
    "oriole", "osprey", "ostrich", "otter", "owl", "ox", "panda", "panther", "parrot", "pelican",
    "penguin", "pony", "puffin", "puma", "quail", "rabbit", "raccoon", "raven", "robin", "salmon",
    "seal", "shark", "sheep", "sloth", "sparrow", "stork", "swan", "tapir", "tiger", "toucan",
    "trout", "turtle", "walrus", "weasel", "whale", "wolf", "wombat", "wren", "yak", "zebra",
];

/// The memorable name of the release `id_hex`, e.g. `brave-otter`; if `taken(name)`,
/// the first free one of `brave-otter-2`, `brave-otter-3`, …
///
/// The words come from a keyed hash of the id rather than its leading digits, so any id
/// (even a short or non-hex one) spreads evenly over the 16,384 pairs.
pub fn memorable(id_hex: &str, taken: &dyn Fn(&str) -> bool) -> String {
    let key = blake3::derive_key("stretch memorable release name v1", id_hex.as_bytes());
    let base = format!(
        "{}-{}",
        ADJECTIVES[usize::from(key[0] & 0x7f)],
        ANIMALS[usize::from(key[1] & 0x7f)]
    );
    if !taken(&base) {
        return base;
    }
    let mut n = 2u64;
    loop {
        let name = format!("{base}-{n}");
        if !taken(&name) {
            return name;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn word_lists_are_unique_short_and_lowercase() {
        for list in [&ADJECTIVES, &ANIMALS] {
            let set: HashSet<_> = list.iter().collect();
            assert_eq!(set.len(), 128, "duplicate word");
            for w in list.iter() {
                assert!(
                    w.len() <= 8 && w.bytes().all(|b| b.is_ascii_lowercase()),
                    "{w}"
                );
            }
        }
    }

    #[test]
    fn same_id_same_name() {
        let free = |_: &str| false;
        let id = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let name = memorable(id, &free);
        assert_eq!(name, memorable(id, &free));
        let (adj, animal) = name.split_once('-').unwrap();
        assert!(
            ADJECTIVES.contains(&adj) && ANIMALS.contains(&animal),
            "{name}"
        );
    }

    #[test]
    fn names_spread_over_ids() {
        let free = |_: &str| false;
        let names: HashSet<_> = (0..200)
            .map(|i| memorable(&format!("{i:064x}"), &free))
            .collect();
        // 200 ids over 16,384 pairs: a handful of collisions at most.
        assert!(names.len() > 190, "{}", names.len());
    }

    #[test]
    fn taken_names_get_a_number() {
        let id = "abc123";
        let base = memorable(id, &|_| false);
        let taken = [base.clone(), format!("{base}-2")];
        assert_eq!(
            memorable(id, &|n| taken.iter().any(|t| t == n)),
            format!("{base}-3")
        );
        assert_eq!(memorable(id, &|n| n == base), format!("{base}-2"));
    }

    #[test]
    fn odd_ids_still_get_names() {
        let free = |_: &str| false;
        assert!(memorable("", &free).contains('-'));
        assert!(memorable("not hex at all", &free).contains('-'));
    }
}
