//! Accuracy and confusion matrix of a classifier on labelled data.

#[derive(Clone, Debug, PartialEq)]
pub struct Confusion {
    pub classes: Vec<String>,
    /// `counts[truth][predicted]`.
    pub counts: Vec<Vec<usize>>,
}

impl Confusion {
    pub fn new(classes: &[String], truth: &[usize], predicted: &[usize]) -> Confusion {
        let n = classes.len();
        let mut counts = vec![vec![0; n]; n];
        for (&t, &p) in truth.iter().zip(predicted) {
            counts[t][p] += 1;
        }
        Confusion {
            classes: classes.to_vec(),
            counts,
        }
    }

    pub fn accuracy(&self) -> f64 {
        let total: usize = self.counts.iter().flatten().sum();
        let right: usize = (0..self.classes.len()).map(|i| self.counts[i][i]).sum();
        if total == 0 {
            0.0
        } else {
            right as f64 / total as f64
        }
    }

    /// Per-class recall (right / that class's examples).
    pub fn recall(&self, class: usize) -> f64 {
        let row: usize = self.counts[class].iter().sum();
        if row == 0 {
            0.0
        } else {
            self.counts[class][class] as f64 / row as f64
        }
    }

    /// A text table: rows are true classes, columns predictions.
    pub fn table(&self) -> String {
        let w = self
            .classes
            .iter()
            .map(|c| c.len())
            .max()
            .unwrap_or(4)
            .max(6);
        let mut s = format!("{:w$}", "true\\pred");
        for c in &self.classes {
            s += &format!(" {:>w$}", c);
        }
        s += &format!(" {:>7}\n", "recall");
        for (i, c) in self.classes.iter().enumerate() {
            s += &format!("{c:w$}");
            for n in &self.counts[i] {
                s += &format!(" {n:>w$}");
            }
            s += &format!(" {:>7.4}\n", self.recall(i));
        }
        s
    }
}
