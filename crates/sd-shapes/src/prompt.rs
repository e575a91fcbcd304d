//! The caption vocabulary and grammar: colours, shapes, relations, and [`Prompt`], which
//! prints as a caption and parses back from one.

use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::error::{Result, ShapesError};

/// The fill colours, each drawn with one exact RGB value: the five of the palette
/// ([`Colour::ALL`]), which prompts, the checker and evaluations use, and five more
/// ([`Colour::EXTRA`]) that only `sd dataset shapes --extra-colours` draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    /// Red: RGB (220, 40, 40).
    Red,
    /// Yellow: RGB (235, 200, 30).
    Yellow,
    /// Green: RGB (40, 170, 60).
    Green,
    /// Blue: RGB (40, 80, 220).
    Blue,
    /// Purple: RGB (150, 60, 190).
    Purple,
    /// Teal, outside the palette: RGB (0, 140, 150).
    Teal,
    /// Pink, outside the palette: RGB (250, 150, 200).
    Pink,
    /// Brown, outside the palette: RGB (120, 70, 20).
    Brown,
    /// Black, outside the palette: RGB (30, 30, 30).
    Black,
    /// Grey, outside the palette: RGB (128, 128, 128).
    Grey,
}

impl Colour {
    /// The palette, in a fixed order (the order prompts are enumerated in).
    pub const ALL: [Colour; 5] = [
        Colour::Red,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
    ];

    /// The colours outside the palette, each more than 90 (Euclidean RGB) from every palette
    /// colour, the background and each other, so that the checker (tolerance
    /// [`crate::COLOUR_TOLERANCE`]) reads none of them as a palette colour. Scenes in them
    /// show each shape in more colours than the palette's, so that a model cannot tie a shape
    /// to the colours it saw it in (docs/shapes.md, "Extra colours in the dataset"); no prompt names them.
    pub const EXTRA: [Colour; 5] = [
        Colour::Teal,
        Colour::Pink,
        Colour::Brown,
        Colour::Black,
        Colour::Grey,
    ];

    /// Whether the colour is outside the palette ([`Colour::EXTRA`]).
    pub fn is_extra(self) -> bool {
        !Colour::ALL.contains(&self)
    }

    /// The exact fill.
    pub const fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Yellow => [235, 200, 30],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Purple => [150, 60, 190],
            Colour::Teal => [0, 140, 150],
            Colour::Pink => [250, 150, 200],
            Colour::Brown => [120, 70, 20],
            Colour::Black => [30, 30, 30],
            Colour::Grey => [128, 128, 128],
        }
    }

    /// The caption word.
    pub const fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::Teal => "teal",
            Colour::Pink => "pink",
            Colour::Brown => "brown",
            Colour::Black => "black",
            Colour::Grey => "grey",
        }
    }

    /// The palette colour a word names: prompts name only those, as the checker sees only
    /// those.
    fn from_word(word: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == word)
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The three solid, axis-aligned shapes. Their size is the side of their (square) bounding box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// A disc filling its box's inscribed circle.
    Circle,
    /// The whole box.
    Square,
    /// Apex at the top middle, base along the bottom, base width equal to the height.
    Triangle,
}

impl Shape {
    /// Every shape, in a fixed order.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The caption word.
    pub const fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    fn from_word(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == word)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the first object of a two-object caption is relative to the second, judged by their
/// centres (image coordinates: `Above` means a smaller y).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    /// `above`: the first centre has the smaller y.
    Above,
    /// `below`: the first centre has the larger y.
    Below,
    /// `to the left of`: the first centre has the smaller x.
    LeftOf,
    /// `to the right of`: the first centre has the larger x.
    RightOf,
}

impl Relation {
    /// Every relation, in a fixed order.
    pub const ALL: [Relation; 4] = [
        Relation::Above,
        Relation::Below,
        Relation::LeftOf,
        Relation::RightOf,
    ];

    /// The caption words.
    pub const fn phrase(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }

    /// The opposite relation: `a above b` says the same as `b below a`.
    pub const fn reversed(self) -> Relation {
        match self {
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
        }
    }

    /// Whether the relation is about the vertical (y) axis.
    pub const fn is_vertical(self) -> bool {
        matches!(self, Relation::Above | Relation::Below)
    }

    /// Whether the second object lies at the larger coordinate along the relation's axis (below
    /// or to the right of the first).
    pub(crate) const fn second_is_after(self) -> bool {
        matches!(self, Relation::Above | Relation::LeftOf)
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.phrase())
    }
}

/// One object as a caption names it: a colour and a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectSpec {
    /// The fill colour.
    pub colour: Colour,
    /// The shape.
    pub shape: Shape,
}

impl ObjectSpec {
    /// Whether this object alone makes a scene held out (a yellow circle, a green triangle).
    fn is_held_out(self) -> bool {
        matches!(
            (self.colour, self.shape),
            (Colour::Yellow, Shape::Circle) | (Colour::Green, Shape::Triangle)
        )
    }
}

impl fmt::Display for ObjectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} {}", self.colour, self.shape)
    }
}

/// What a caption says: one object, or two objects of different colours in a relation.
///
/// It prints as the dataset's caption (`a red square`, `a red square to the left of a blue
/// circle`) and parses back from one ([`FromStr`]: case, surrounding space and a final `.` are
/// ignored; `an` is accepted for `a`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prompt {
    /// `a red square`: one object.
    One(ObjectSpec),
    /// `a red square to the left of a blue circle`: the first object, its relation to the second,
    /// the second.
    Two(ObjectSpec, Relation, ObjectSpec),
}

impl Prompt {
    /// The objects named, in caption order.
    pub fn objects(&self) -> Vec<ObjectSpec> {
        match *self {
            Prompt::One(a) => vec![a],
            Prompt::Two(a, _, b) => vec![a, b],
        }
    }

    /// The relation, for two objects.
    pub fn relation(&self) -> Option<Relation> {
        match *self {
            Prompt::One(_) => None,
            Prompt::Two(_, r, _) => Some(r),
        }
    }

    /// The same scene said with `above` or `to the left of` only: `b below a` becomes `a
    /// above b`, `b to the right of a` becomes `a to the left of b`, so the first object named
    /// is always the top or left one. The shapes recipe trains on these first: a caption's
    /// relation times its word order (what `below` flips) is what a text encoder trained from
    /// scratch failed to learn, while either alone it learnt (docs/shapes.md, "Why the order
    /// is not learnt").
    pub fn canonical(&self) -> Prompt {
        match *self {
            Prompt::Two(a, relation, b) if !relation.second_is_after() => {
                Prompt::Two(b, relation.reversed(), a)
            }
            prompt => prompt,
        }
    }

    /// Whether the combination is held out of every training image and caption: two objects
    /// of which one is red and the other blue; or any object that is a yellow circle or a
    /// green triangle.
    pub fn is_held_out(&self) -> bool {
        let red_and_blue = match *self {
            Prompt::One(_) => false,
            Prompt::Two(a, _, b) => {
                let pair = (a.colour, b.colour);
                pair == (Colour::Red, Colour::Blue) || pair == (Colour::Blue, Colour::Red)
            }
        };
        red_and_blue || self.objects().into_iter().any(ObjectSpec::is_held_out)
    }

    /// Every prompt the grammar allows, in a fixed order: 15 of one object and 720 of two
    /// (ordered pairs of different colours, any shapes, any relation).
    pub fn all() -> Vec<Prompt> {
        let specs: Vec<ObjectSpec> = Colour::ALL
            .into_iter()
            .flat_map(|colour| Shape::ALL.map(|shape| ObjectSpec { colour, shape }))
            .collect();
        let mut prompts: Vec<Prompt> = specs.iter().map(|&a| Prompt::One(a)).collect();
        for &a in &specs {
            for relation in Relation::ALL {
                for &b in specs.iter().filter(|b| b.colour != a.colour) {
                    prompts.push(Prompt::Two(a, relation, b));
                }
            }
        }
        prompts
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prompt::One(a) => write!(f, "{a}"),
            Prompt::Two(a, relation, b) => write!(f, "{a} {relation} {b}"),
        }
    }
}

impl FromStr for Prompt {
    type Err = ShapesError;

    fn from_str(text: &str) -> Result<Prompt> {
        let fail = |reason: &str| ShapesError::Prompt {
            prompt: text.to_owned(),
            reason: reason.to_owned(),
        };
        let lower = text.trim().to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let words: Vec<&str> = lower.split_whitespace().collect();
        let (first, rest) = parse_object(&words).map_err(fail)?;
        if rest.is_empty() {
            return Ok(Prompt::One(first));
        }
        let (relation, rest) = Relation::ALL
            .into_iter()
            .find_map(|r| {
                let phrase: Vec<&str> = r.phrase().split(' ').collect();
                rest.strip_prefix(phrase.as_slice()).map(|rest| (r, rest))
            })
            .ok_or_else(|| {
                fail("expected a relation (above, below, to the left of, to the right of)")
            })?;
        let (second, rest) = parse_object(rest).map_err(fail)?;
        if !rest.is_empty() {
            return Err(fail("unexpected words after the second object"));
        }
        if first.colour == second.colour {
            return Err(fail("the two objects must have different colours"));
        }
        Ok(Prompt::Two(first, relation, second))
    }
}

/// Reads `a {colour} {shape}` off the front of `words`.
fn parse_object<'a, 'b>(
    words: &'a [&'b str],
) -> std::result::Result<(ObjectSpec, &'a [&'b str]), &'static str> {
    let [article, colour, shape, rest @ ..] = words else {
        return Err("expected `a {colour} {shape}`");
    };
    if !matches!(*article, "a" | "an") {
        return Err("expected `a` before an object");
    }
    let colour =
        Colour::from_word(colour).ok_or("expected a colour (red, yellow, green, blue, purple)")?;
    let shape = Shape::from_word(shape).ok_or("expected a shape (circle, square, triangle)")?;
    Ok((ObjectSpec { colour, shape }, rest))
}

/// How many prompts of each kind an evaluation uses by default.
pub const EVAL_PROMPT_COUNT: usize = 40;

/// `n` distinct held-out prompts (never in training), chosen by `seed`: about 40% of one
/// object (as many as exist: there are only two) and the rest of two, in a shuffled order.
/// Fewer than `n` when fewer exist (258 in all).
pub fn held_out_prompts(n: usize, seed: u64) -> Vec<String> {
    eval_prompts(n, seed, true)
}

/// `n` distinct prompts of combinations the training data holds, chosen by `seed`, in the same
/// proportions as [`held_out_prompts`] (477 exist).
pub fn seen_prompts(n: usize, seed: u64) -> Vec<String> {
    eval_prompts(n, seed, false)
}

fn eval_prompts(n: usize, seed: u64, held_out: bool) -> Vec<String> {
    let (mut ones, mut twos): (Vec<Prompt>, Vec<Prompt>) = Prompt::all()
        .into_iter()
        .filter(|p| p.is_held_out() == held_out)
        .partition(|p| matches!(p, Prompt::One(_)));
    let mut rng = StdRng::seed_from_u64(seed);
    ones.shuffle(&mut rng);
    twos.shuffle(&mut rng);
    // The dataset's own mix (40% one object), where there are enough of each.
    let want_ones = (n * 2).div_ceil(5);
    let take_twos = twos.len().min(n - want_ones.min(ones.len()));
    let take_ones = ones.len().min(n - take_twos);
    let mut chosen: Vec<Prompt> = ones[..take_ones]
        .iter()
        .chain(&twos[..take_twos])
        .copied()
        .collect();
    chosen.shuffle(&mut rng);
    chosen.iter().map(Prompt::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_round_trip() {
        for prompt in Prompt::all() {
            let text = prompt.to_string();
            assert_eq!(text.parse::<Prompt>().unwrap(), prompt, "{text}");
        }
        let p: Prompt = "  A Red Square To The Left Of An Blue Circle. "
            .parse()
            .unwrap();
        assert_eq!(p.to_string(), "a red square to the left of a blue circle");
    }

    #[test]
    fn bad_prompts_are_refused() {
        for text in [
            "",
            "red square",
            "a red",
            "a pink square",
            "a red hexagon",
            "a red square near a blue circle",
            "a red square above",
            "a red square above a blue circle and more",
            "a red square above a red circle",
            "the red square",
        ] {
            assert!(text.parse::<Prompt>().is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn canonical_prompts_name_the_top_or_left_object_first() {
        let parse = |text: &str| text.parse::<Prompt>().unwrap();
        for (said, canonical) in [
            (
                "a red circle below a blue square",
                "a blue square above a red circle",
            ),
            (
                "a red circle to the right of a blue square",
                "a blue square to the left of a red circle",
            ),
            (
                "a red circle above a blue square",
                "a red circle above a blue square",
            ),
            (
                "a green triangle to the left of a red circle",
                "a green triangle to the left of a red circle",
            ),
            ("a red circle", "a red circle"),
        ] {
            assert_eq!(parse(said).canonical(), parse(canonical), "{said}");
        }
        for prompt in Prompt::all() {
            let canonical = prompt.canonical();
            assert_eq!(canonical.canonical(), canonical);
            assert_eq!(canonical.is_held_out(), prompt.is_held_out());
            if let Some(relation) = canonical.relation() {
                assert!(matches!(relation, Relation::Above | Relation::LeftOf));
            }
        }
    }

    #[test]
    fn held_out_counts() {
        let all = Prompt::all();
        assert_eq!(all.len(), 15 + 720);
        let held = all.iter().filter(|p| p.is_held_out()).count();
        assert_eq!(held, 258);
        assert!(
            Prompt::One(ObjectSpec {
                colour: Colour::Yellow,
                shape: Shape::Circle
            })
            .is_held_out()
        );
        let red = ObjectSpec {
            colour: Colour::Red,
            shape: Shape::Square,
        };
        let blue = ObjectSpec {
            colour: Colour::Blue,
            shape: Shape::Square,
        };
        let green = ObjectSpec {
            colour: Colour::Green,
            shape: Shape::Square,
        };
        assert!(Prompt::Two(blue, Relation::Above, red).is_held_out());
        assert!(!Prompt::Two(green, Relation::Above, red).is_held_out());
        assert!(!Prompt::One(red).is_held_out());
    }

    #[test]
    fn eval_prompts_are_deterministic_distinct_and_of_their_kind() {
        for (list, held) in [
            (held_out_prompts(EVAL_PROMPT_COUNT, 7), true),
            (seen_prompts(EVAL_PROMPT_COUNT, 7), false),
        ] {
            assert_eq!(list.len(), EVAL_PROMPT_COUNT);
            let mut unique = list.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), list.len());
            for text in &list {
                assert_eq!(
                    text.parse::<Prompt>().unwrap().is_held_out(),
                    held,
                    "{text}"
                );
            }
        }
        assert_eq!(held_out_prompts(40, 7), held_out_prompts(40, 7));
        assert_ne!(seen_prompts(40, 7), seen_prompts(40, 8));
        // Both one-object held-out prompts are in, and all 13 seen single objects (16 wanted).
        let ones = |l: Vec<String>| l.iter().filter(|t| !t.contains(" a ")).count();
        assert_eq!(ones(held_out_prompts(40, 1)), 2);
        assert_eq!(ones(seen_prompts(40, 1)), 13);
        assert_eq!(held_out_prompts(10_000, 1).len(), 258);
        assert_eq!(seen_prompts(10_000, 1).len(), 477);
        assert!(seen_prompts(0, 1).is_empty());
    }
}
